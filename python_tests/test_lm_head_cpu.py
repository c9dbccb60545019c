"""The CPU C++ LM-head loss ops (csrc/cpu/lm_head.cpp) against a plain unfused computation.

The reference is written out here: z = x Eᵀ + b over the whole vocabulary (E's padding row read as
zero), log-softmax for the cross-entropy, label smoothing, z-loss and the augmented loss's KL, and
autograd for the gradients of Σ_t g_t loss_t. fp32 is compared with the float64 reference at the
fp32 tolerance; bf16 / fp16 with the float64 reference within twice the error of the same
computation run with its GEMMs in that dtype (tolerances.py).
"""
import random

import pytest
import torch

from define_kernels.backends import cpp_ext
from onednn import onednn
from tolerances import assert_close, assert_low_precision_close

pytestmark = pytest.mark.skipif(cpp_ext.unavailable_reason() is not None, reason="define_kernels_C not built")


def ops():
    return torch.ops.define_kernels_C


def reference(x, table, bias, targets, pad, smoothing, z_loss, augmented, kl_coef, tau, grad, gemm_dtype):
    """(loss, ce, kl, stats) and (grad_x, grad_table, grad_bias) with the GEMMs in gemm_dtype and
    everything else in float64 (gemm_dtype float64: the exact reference)."""
    x = x.detach().double().requires_grad_()
    table = table.detach().double().requires_grad_()
    bias = bias.detach().double().requires_grad_() if bias is not None else None
    keep = torch.ones(table.shape[0], 1, dtype=torch.float64)
    if pad >= 0:
        keep[pad] = 0
    e = table * keep
    z = (x.to(gemm_dtype) @ e.to(gemm_dtype).T).double()
    if bias is not None:
        z = z + bias
    lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, targets[:, None])[:, 0]
    ce = (1 - smoothing) * (lse - picked) + smoothing * (lse - z.mean(dim=1))
    loss = ce + z_loss * lse ** 2
    kl = torch.zeros_like(lse)
    lse_q = torch.zeros_like(lse)
    lse_s = torch.zeros_like(lse)
    if augmented:
        u = e.detach()[targets]
        s = (u.to(gemm_dtype) @ e.detach().to(gemm_dtype).T).double() / tau
        lse_s = torch.logsumexp(s, dim=1)
        lse_q = torch.logsumexp(z / tau, dim=1)
        kl = (torch.softmax(s, dim=1) * (s - z / tau)).sum(dim=1) - lse_s + lse_q
        loss = loss + kl_coef * kl
    inputs = [x, table] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad((loss * grad.double()).sum(), inputs) if len(loss) else [torch.zeros_like(t) for t in inputs]
    grad_bias = grads[2] if bias is not None else torch.empty(0)
    stats = torch.stack([lse, lse_q, lse_s], dim=1)
    return (loss, ce, kl, stats), (grads[0], grads[1], grad_bias)


def run(x, table, bias, targets, pad, smoothing, z_loss, augmented, kl_coef, tau, grad, compute):
    fwd = ops().lm_head_forward(x, table, bias, targets, pad, smoothing, z_loss, augmented, kl_coef, tau, compute)
    bwd = ops().lm_head_backward(grad, x, table, bias, targets, fwd[3], pad, smoothing, z_loss, augmented,
                                 kl_coef, tau, compute)
    return fwd, bwd


def make_case(rng, tokens, width, vocab, x_dtype, table_dtype, with_bias, pad, augmented):
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = (torch.randn(tokens, width, generator=gen) * 0.5).to(x_dtype)
    table = (torch.randn(vocab, width, generator=gen) * 0.5).to(table_dtype)
    bias = (torch.randn(vocab, generator=gen) * 0.3) if with_bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    if pad >= 0 and tokens > 1:
        targets[0] = pad  # the padding row as a target: its logit is the bias alone
    grad = torch.rand(tokens, generator=gen) + 0.5
    return x, table, bias, targets, grad


def normalized(t):
    return t.double() / (t.double().abs().max().clamp_min(1.0) if t.numel() else 1.0)


def check(case, pad, smoothing, z_loss, augmented, kl_coef, tau, compute):
    x, table, bias, targets, grad = case
    args = (x, table, bias, targets, pad, smoothing, z_loss, augmented, kl_coef, tau, grad)
    (fwd, bwd) = run(*args, compute)
    exact_fwd, exact_bwd = reference(*args, torch.float64)
    names = ["loss", "ce", "kl", "stats", "grad_x", "grad_table", "grad_bias"]
    assert bwd[0].dtype == x.dtype and bwd[1].dtype == table.dtype
    assert bwd[2].dtype == (bias.dtype if bias is not None else torch.float32)
    if pad >= 0:
        assert bwd[1][pad].abs().max() == 0, "the padding row's gradient must be exactly 0"
    actual = list(fwd) + list(bwd)
    exact = list(exact_fwd) + list(exact_bwd)
    if compute == torch.float32:
        for a, e, name in zip(actual, exact, names):
            assert_close(normalized(a).to(a.dtype), normalized(e), torch.float32, name)
        return
    in_dtype = list(sum(reference(*args, compute), ()))
    for a, e, r, name in zip(actual, exact, in_dtype, names):
        assert_low_precision_close(normalized(a).to(compute), normalized(e), normalized(r), name)


CASES = [
    # tokens, width, vocab, x dtype, table dtype, bias, pad, smoothing, z_loss, augmented, kl_coef, tau, compute
    (0, 7, 33, torch.float32, torch.float32, True, -1, 0.0, 0.0, False, 0.0, 1.0, torch.float32),
    (1, 5, 1, torch.float32, torch.float32, False, -1, 0.0, 0.0, False, 0.0, 1.0, torch.float32),
    (1, 9, 2, torch.float32, torch.float32, True, 0, 0.1, 1e-3, True, 0.5, 2.0, torch.float32),
    (37, 13, 301, torch.float32, torch.float32, True, 5, 0.1, 1e-4, False, 0.0, 1.0, torch.float32),
    (64, 31, 1000, torch.float32, torch.float32, False, -1, 0.0, 0.0, True, 0.7, 1.5, torch.float32),
    (50, 17, 2049, torch.float32, torch.float32, True, 2048, 0.2, 1e-2, True, 1.0, 0.7, torch.float32),
    (33, 16, 517, torch.bfloat16, torch.bfloat16, True, 3, 0.1, 1e-4, False, 0.0, 1.0, torch.bfloat16),
    (40, 15, 700, torch.bfloat16, torch.float32, True, -1, 0.0, 1e-3, True, 0.5, 2.0, torch.bfloat16),
    (29, 24, 390, torch.float16, torch.float16, False, 7, 0.1, 0.0, True, 0.3, 1.0, torch.float16),
    (21, 11, 129, torch.float32, torch.float32, True, -1, 0.05, 0.0, False, 0.0, 1.0, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_unfused_reference(case):
    tokens, width, vocab, xd, td, with_bias, pad, eps, zl, aug, kc, tau, compute = case
    rng = random.Random(hash(case) & 0xFFFF)
    check(make_case(rng, tokens, width, vocab, xd, td, with_bias, pad, aug), pad, eps, zl, aug, kc, tau, compute)


@pytest.mark.parametrize("seed", range(6))
def test_random_configs(seed):
    rng = random.Random(1000 + seed)
    vocab = rng.choice([1, 3, 127, 129, 255, 513, rng.randrange(2, 3000)])
    tokens, width = rng.choice([0, 1, 2, rng.randrange(3, 70)]), rng.randrange(1, 40) | 1
    compute = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    xd = compute if compute != torch.float32 else torch.float32
    td = rng.choice([xd, torch.float32])
    pad = rng.choice([-1, rng.randrange(vocab)])
    aug = rng.random() < 0.5
    check(make_case(rng, tokens, width, vocab, xd, td, rng.random() < 0.5, pad, aug), pad,
          rng.choice([0.0, 0.1]), rng.choice([0.0, 1e-3]), aug, rng.choice([0.3, 1.0]), rng.choice([0.5, 1.0, 2.0]),
          compute)


# Several token chunks and vocabulary tiles of the 16-bit kernels (brgemm chunks of 128 tokens,
# tiles of 256 columns), odd everything, on both paths: brgemm (bf16 with oneDNN on, where the
# CPU packs bf16) and ATen GEMMs (oneDNN off, and fp16 always).
MULTI_CHUNK = [
    # tokens, width, vocab, x dtype, table dtype, bias, pad, smoothing, z_loss, augmented, kl_coef, tau, compute
    (301, 37, 777, torch.bfloat16, torch.float32, True, 600, 0.1, 1e-3, True, 0.5, 2.0, torch.bfloat16),
    (257, 64, 513, torch.bfloat16, torch.bfloat16, False, -1, 0.0, 0.0, False, 0.0, 1.0, torch.bfloat16),
    (129, 9, 255, torch.float32, torch.float32, True, 0, 0.2, 0.0, False, 0.0, 1.0, torch.bfloat16),
    (200, 21, 300, torch.float16, torch.float32, True, 5, 0.0, 1e-3, True, 1.0, 0.7, torch.float16),
]


@pytest.mark.parametrize("use_onednn", [True, False], ids=["onednn", "aten"])
@pytest.mark.parametrize("case", MULTI_CHUNK)
def test_16bit_paths_over_chunks_and_tiles(case, use_onednn):
    tokens, width, vocab, xd, td, with_bias, pad, eps, zl, aug, kc, tau, compute = case
    rng = random.Random(hash(case) & 0xFFFF)
    with onednn(use_onednn):
        check(make_case(rng, tokens, width, vocab, xd, td, with_bias, pad, aug), pad, eps, zl, aug, kc, tau, compute)


@pytest.mark.parametrize("tokens,width,vocab", [(1, 1, 1), (2, 2, 2), (3, 3, 17), (127, 1, 3), (128, 2, 257),
                                                (129, 3, 256), (1, 130, 1)])
def test_16bit_edge_sizes(tokens, width, vocab):
    # one-row / one-column GEMMs, odd K padded to even, a chunk or tile of exactly one element
    rng = random.Random(tokens * 1000 + width * 10 + vocab)
    case = make_case(rng, tokens, width, vocab, torch.bfloat16, torch.float32, True, vocab - 1, vocab > 2)
    check(case, vocab - 1, 0.1, 1e-3, vocab > 2, 0.5, 2.0, torch.bfloat16)


# Logits that rise tile by tile by more than the forward epilogue's slack (20; 10 for q at τ = 0.5)
# must be summed again against the new maximum, not overflow exp; falling logits keep the first
# tile's reference. Steps of 25 every 100 ids cross every tile boundary of every path.
@pytest.mark.parametrize("compute,use_onednn", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=["fp32", "bf16-onednn", "bf16-aten"])
@pytest.mark.parametrize("rising", [True, False], ids=["rising", "falling"])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_logits_far_above_the_first_tiles(compute, use_onednn, rising, tau):
    rng = random.Random(17)
    x, table, _, targets, grad = make_case(rng, 70, 19, 1500, compute, torch.float32, True, -1, True)
    steps = 25.0 * torch.div(torch.arange(1500), 100, rounding_mode="floor")
    bias = steps if rising else steps.flip(0)
    with onednn(use_onednn):
        check((x, table, bias, targets, grad), -1, 0.1, 1e-4, True, 0.5, tau, compute)


def test_16bit_paths_agree_and_brgemm_keeps_fp32_logits():
    """Where the CPU packs bf16 (AMX), the brgemm path differs from the ATen one (its logits never
    round to bf16), and both are within the bf16 tolerance of each other."""
    size = ops().lm_head_workspace_bytes
    with onednn(False):
        aten_bytes = size(300, 64, 1000, False, torch.bfloat16)
    if size(300, 64, 1000, False, torch.bfloat16) == aten_bytes:
        pytest.skip("this CPU's oneDNN does not pack bf16 for brgemm: the ATen path runs either way")
    rng = random.Random(11)
    x, table, bias, targets, grad = make_case(rng, 300, 64, 1000, torch.bfloat16, torch.float32, True, -1, False)
    x = x * 8  # large logits: bf16-rounded logits would move the loss visibly
    args = (x, table, bias, targets, -1, 0.0, 0.0, False, 0.0, 1.0, grad, torch.bfloat16)
    brgemm = run(*args)
    with onednn(False):
        aten = run(*args)
    exact = reference(*args[:-1], torch.float64)[0][0]
    gemm_only = reference(x.float(), table.bfloat16().float(), bias, targets, -1, 0.0, 0.0, False, 0.0, 1.0, grad,
                          torch.float64)[0][0]
    # the brgemm loss is the exact loss of the bf16-rounded inputs up to fp32 accumulation
    assert (brgemm[0][0].double() - gemm_only).abs().max() < 1e-3
    assert (aten[0][0].double() - exact).abs().max() > (brgemm[0][0].double() - gemm_only).abs().max()


def test_non_contiguous_x_and_bf16_bias():
    rng = random.Random(7)
    x, table, bias, targets, grad = make_case(rng, 20, 12, 300, torch.float32, torch.float32, True, -1, False)
    wide = torch.zeros(20, 24)
    wide[:, ::2] = x
    bias16 = bias.bfloat16()
    fwd, bwd = run(wide[:, ::2], table, bias16, targets, -1, 0.0, 0.0, False, 0.0, 1.0, grad, torch.float32)
    ref_fwd, ref_bwd = reference(x, table, bias16.float(), targets, -1, 0.0, 0.0, False, 0.0, 1.0, grad, torch.float64)
    assert_close(fwd[0], ref_fwd[0].float(), torch.float32, "loss")
    assert bwd[2].dtype == torch.bfloat16
    assert_close(bwd[0], ref_bwd[0].float(), torch.float32, "grad_x")


def test_deterministic():
    rng = random.Random(3)
    for compute in (torch.float32, torch.bfloat16):
        case = make_case(rng, 70, 33, 1500, compute, torch.float32, True, 4, True)
        x, table, bias, targets, grad = case
        first = run(x, table, bias, targets, 4, 0.1, 1e-3, True, 0.5, 2.0, grad, compute)
        second = run(x, table, bias, targets, 4, 0.1, 1e-3, True, 0.5, 2.0, grad, compute)
        for a, b in zip(sum(first, ()), sum(second, ())):
            assert torch.equal(a, b)


def test_bad_inputs_name_the_argument():
    x, table, targets = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    f = ops().lm_head_forward
    common = (-1, 0.0, 0.0, False, 0.0, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="targets"):
        f(x, table, None, torch.tensor([0, 1, 2, 10]), *common)
    with pytest.raises(RuntimeError, match="targets"):
        f(x, table, None, torch.tensor([0, -1, 2, 3]), *common)
    with pytest.raises(RuntimeError, match="targets"):
        f(x, table, None, targets.int(), *common)
    with pytest.raises(RuntimeError, match="table"):
        f(x, torch.randn(10, 7), None, targets, *common)
    with pytest.raises(RuntimeError, match="bias"):
        f(x, table, torch.randn(9), targets, *common)
    with pytest.raises(RuntimeError, match="x"):
        f(x.double(), table, None, targets, *common)
    with pytest.raises(RuntimeError, match="tau"):
        f(x, table, None, targets, -1, 0.0, 0.0, True, 1.0, 0.0, torch.float32)
    with pytest.raises(RuntimeError, match="padding_idx"):
        f(x, table, None, targets, 10, 0.0, 0.0, False, 0.0, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="compute_dtype"):
        f(x, table, None, targets, -1, 0.0, 0.0, False, 0.0, 1.0, torch.float64)
    stats = f(x, table, None, targets, *common)[3]
    b = ops().lm_head_backward
    with pytest.raises(RuntimeError, match="grad_loss"):
        b(torch.ones(3), x, table, None, targets, stats, *common)
    with pytest.raises(RuntimeError, match="stats"):
        b(torch.ones(4), x, table, None, targets, stats[:, :2], *common)


def test_workspace_independent_of_vocab():
    size = ops().lm_head_workspace_bytes
    for aug in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            assert size(4096, 128, 1000, aug, dtype) == size(4096, 128, 1_000_000, aug, dtype)
            assert size(1024, 128, 1000, aug, dtype) < size(4096, 128, 1000, aug, dtype)
    assert size(0, 128, 1000, False, torch.float32) == 0

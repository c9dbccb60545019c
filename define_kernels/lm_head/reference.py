"""The LM-head loss in plain PyTorch: the executable form of SPEC §4b on the kept tokens.

Tokens are taken in chunks of at most CHUNK_ELEMENTS logits, so even this reference never holds
[tokens x V]; the fused backends must equal it. The GEMMs run in the spec's compute dtype, every
statistic in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from .contract import LMHeadSpec, STATS, stats_dtype

CHUNK_ELEMENTS = 1 << 22


def _chunks(tokens: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, tokens, rows):
        yield slice(start, min(start + rows, tokens))


def _table(table: torch.Tensor, spec: LMHeadSpec, dtype: torch.dtype) -> torch.Tensor:
    """The table in the GEMM dtype, its padding row read as zero."""
    table = table.to(dtype)
    if spec.padding_idx is not None:
        table = table.index_fill(0, torch.tensor([spec.padding_idx], device=table.device), 0)
    return table


def _logits(x, table_c, bias, acc):
    z = (x.to(table_c.dtype) @ table_c.t()).to(acc)
    return z if bias is None else z + bias.to(acc)


def _similarity(targets, table_c, tau, acc):
    """s = E[y] E^T / tau (the augmented loss's targets), zero for a padding target."""
    u = table_c.index_select(0, targets)
    return (u @ table_c.t()).to(acc) / tau


def _terms(x, table_c, bias, targets, spec, acc):
    """Per-token loss parts and stats of one chunk; returns (loss, ce, kl, stats, z, s)."""
    z = _logits(x, table_c, bias, acc)
    lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, targets[:, None]).squeeze(1)
    eps = spec.label_smoothing
    ce = (1 - eps) * (lse - picked) + eps * (lse - z.mean(dim=1))
    loss = ce + spec.z_loss * lse * lse
    stats = torch.zeros(len(targets), STATS, dtype=acc, device=x.device)
    stats[:, 0] = lse
    kl = torch.zeros_like(lse)
    s = None
    if spec.augmented:
        s = _similarity(targets, table_c, spec.tau, acc)
        lse_zt, lse_s = torch.logsumexp(z / spec.tau, dim=1), torch.logsumexp(s, dim=1)
        target = torch.softmax(s, dim=1)
        kl = (target * (s - z / spec.tau)).sum(dim=1) - lse_s + lse_zt
        loss = loss + spec.kl_coef * kl
        stats[:, 1], stats[:, 2] = lse_zt, lse_s
    return loss, ce, kl, stats, z, s


def forward(x, table, bias, targets, spec: LMHeadSpec):
    acc = stats_dtype(x)
    table_c = _table(table, spec, spec.gemm_dtype(x, table))
    parts = [torch.empty(0, dtype=acc, device=x.device)] * 3 + [x.new_empty(0, STATS, dtype=acc)]
    outputs = [list() for _ in range(4)]
    for rows in _chunks(x.shape[0], table.shape[0]):
        for out, value in zip(outputs, _terms(x[rows], table_c, bias, targets[rows], spec, acc)[:4]):
            out.append(value)
    return tuple(torch.cat(out) if out else empty for out, empty in zip(outputs, parts))


def logit_grad(z, s, targets, stats, grad_loss, spec: LMHeadSpec, vocab: int):
    """d loss / d z of one chunk (SPEC §4b), already times the per-token upstream gradient."""
    lse = stats[:, :1]
    p = torch.exp(z - lse)
    dz = (1 + 2 * spec.z_loss * lse) * p - spec.label_smoothing / vocab
    dz.scatter_add_(1, targets[:, None], torch.full_like(lse, -(1 - spec.label_smoothing)))
    if spec.augmented:
        q = torch.exp(z / spec.tau - stats[:, 1:2])
        target = torch.exp(s - stats[:, 2:3])
        dz += spec.kl_coef / spec.tau * (q - target)
    return dz * grad_loss[:, None]


def _similarity_grad(z, s, targets, stats, grad_loss, spec, table_c, grad_table):
    """The path through s when the augmented loss's targets are not detached."""
    target = torch.exp(s - stats[:, 2:3])
    mean_gap = (target * (s - z / spec.tau)).sum(dim=1, keepdim=True)
    ds = spec.kl_coef * grad_loss[:, None] * target * (s - z / spec.tau - mean_gap) / spec.tau
    u = table_c.index_select(0, targets).to(ds.dtype)
    grad_table += ds.t() @ u
    grad_table.index_add_(0, targets, ds @ table_c.to(ds.dtype))


def backward(grad_loss, x, table, bias, targets, stats, spec: LMHeadSpec):
    acc = stats_dtype(x)
    vocab = table.shape[0]
    table_c = _table(table, spec, spec.gemm_dtype(x, table))
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_table = torch.zeros(table.shape, dtype=acc, device=x.device)
    grad_bias = torch.zeros(vocab, dtype=acc, device=x.device)
    for rows in _chunks(x.shape[0], vocab):
        xc, yc, statc = x[rows], targets[rows], stats[rows]
        z = _logits(xc, table_c, bias, acc)
        s = _similarity(yc, table_c, spec.tau, acc) if spec.augmented else None
        dz = logit_grad(z, s, yc, statc, grad_loss[rows].to(acc), spec, vocab)
        grad_x[rows] = (dz.to(table_c.dtype) @ table_c).to(acc)
        grad_table += (dz.t().to(table_c.dtype) @ xc.to(table_c.dtype)).to(acc)
        grad_bias += dz.sum(dim=0)
        if spec.augmented and not spec.detach_target:
            _similarity_grad(z, s, yc, statc, grad_loss[rows].to(acc), spec, table_c, grad_table)
    if spec.padding_idx is not None:
        grad_table[spec.padding_idx] = 0
    empty = torch.empty(0, dtype=table.dtype, device=x.device)
    return (grad_x.to(x.dtype), grad_table.to(table.dtype),
            grad_bias.to(bias.dtype) if bias is not None else empty)

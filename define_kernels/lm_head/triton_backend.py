"""The `triton` LM-head backend: cuBLAS GEMMs per vocabulary chunk + Triton kernels for the loss.

Design
------
The vocabulary is walked in chunks of Vc columns, Vc = SCRATCH_ELEMENTS // N rounded to the
kernels' column tile, so the scratch is [N, Vc] whatever V is (about 128 MB of bf16 logits at
SCRATCH_ELEMENTS = 2^26; twice that with the augmented loss's similarity logits).

Forward, per chunk: z_c = x E_cᵀ by torch.mm in the compute dtype (the result in that dtype too,
as reference.py rounds it), s_c = E[y] E_cᵀ for the augmented loss (one row per distinct target y
of the batch, which every token with that target reads), then lm_head_stats_kernel
folds the chunk into per-token running statistics (online max / sum of exponentials of z, z/τ
and s; the ỹ-weighted sum of s − z/τ; Σz; the target's logit; the bias added in fp32). The
(loss, ce, kl, stats) of reference.forward are then a few elementwise ops on [N] vectors.
Backward, per chunk: z_c (and s_c) recomputed, lm_head_grad_kernel overwrites z_c with dz
(reference.logit_grad) in the compute dtype plus fp32 per-program column sums for the bias, then
grad_x += dz E_c (accumulated in fp32), grad_table[c] = dzᵀ x and grad_bias[c] = Σ_t dz.
E_c is the table's chunk cast to the compute dtype (autocast: a bf16 copy of Vc rows, never of
the whole table), with the padding row zeroed, so the padding column's dz reaches no gradient
but the bias's. No atomics: results are deterministic.

Availability: CUDA tensors, priority 5 (ahead of cpu_cpp's 10 and the reference's 100). With
TRITON_INTERPRET=1 (tests) also CPU tensors, where torch.mm runs on the CPU and Triton's
interpreter runs the same kernels, at INTERPRETER_PRIORITY, behind the reference, so `auto` never
picks the interpreter. Importing this module does not import triton; first use does.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import List, Optional

import torch

from ..backends import triton_launch
from ..backends.triton_launch import interpreting
from .contract import LMHeadSpec, STATS
from .registry import HeadBackend, register

PRIORITY = 5
INTERPRETER_PRIORITY = 2000
SCRATCH_ELEMENTS = 1 << 26             # [N, Vc] logits per chunk on a GPU
INTERPRETER_SCRATCH_ELEMENTS = 1 << 10  # small chunks: the tests cross chunk edges at tiny V


def unavailable_reason() -> Optional[str]:
    return triton_launch.unavailable_reason(__package__ + ".triton_kernels")


def input_reasons(x, table, spec: LMHeadSpec) -> List[str]:
    if spec.augmented and not spec.detach_target:
        return ["the augmented loss with detach_target=False runs on the reference backend only"]
    return []


# Launch tiles on a GPU. sm_90a compiles (bench.resource_report, every dtype, augmented or not):
# the stats kernel holds seven running [BLOCK_N] vectors besides its tiles and reached 255
# registers with 208 B spilled at 16 x 128 (4 warps, augmented); 4 x 256 gives 48-80 registers.
# The gradient kernel: 192 registers at 16 x 128 (augmented), 62-108 at 8 x 128. Small row tiles
# also give N / 4 programs (2,048 at N = 8,192) to stream the scratch with.
GPU_TILES = dict(stats=dict(BLOCK_N=4, BLOCK_V=256, num_warps=4, num_stages=3),
                 grad=dict(BLOCK_N=8, BLOCK_V=128, ROWS_PER_PROGRAM=256, num_warps=4, num_stages=3))
# the interpreter: tiny tiles, so tiny test shapes still span several tiles, rows and chunks
INTERPRETER_TILES = dict(stats=dict(BLOCK_N=4, BLOCK_V=16, num_warps=1),
                         grad=dict(BLOCK_N=4, BLOCK_V=16, ROWS_PER_PROGRAM=8, num_warps=1))


def tiles() -> dict:
    return INTERPRETER_TILES if interpreting() else GPU_TILES


def chunk_columns(tokens: int, vocab: int, block: int) -> int:
    """Vc: as many columns as the scratch budget allows for `tokens` rows, a multiple of the
    column tile, at least one tile, at most the vocabulary."""
    budget = INTERPRETER_SCRATCH_ELEMENTS if interpreting() else SCRATCH_ELEMENTS
    columns = max(block, budget // max(tokens, 1) // block * block)
    return min(columns, -(-vocab // block) * block)


def workspace_bytes(tokens: int, vocab: int, spec: LMHeadSpec, dtype: torch.dtype) -> int:
    """Bytes of the per-call [N, Vc] chunk scratch in the compute dtype (logits, and at most as
    many similarity logits for the augmented loss): bounded by SCRATCH_ELEMENTS whatever the
    vocabulary."""
    columns = min(chunk_columns(tokens, vocab, tiles()["stats"]["BLOCK_V"]), vocab)
    return tokens * columns * dtype.itemsize * (2 if spec.augmented else 1)


def _table_chunk(table, start: int, stop: int, dtype, padding_idx: Optional[int]) -> torch.Tensor:
    """Rows [start, stop) of the table in the GEMM dtype, the padding row read as zero."""
    chunk = table[start:stop]
    has_padding = padding_idx is not None and start <= padding_idx < stop
    if chunk.dtype != dtype:
        chunk = chunk.to(dtype)
    elif has_padding:
        chunk = chunk.clone()
    if has_padding:
        chunk[padding_idx - start] = 0
    return chunk


def _target_rows(table, targets, dtype, padding_idx) -> torch.Tensor:
    """E[y] in the GEMM dtype (zero for a padding target): the augmented loss's left operand."""
    rows = table.index_select(0, targets).to(dtype)
    if padding_idx is not None:
        rows.masked_fill_((targets == padding_idx)[:, None], 0)
    return rows


def _on_device(device):
    """Triton launches on the current device: make it the tensors' GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Chunks:
    """The per-call setup shared by forward and backward: dtype, operands, scratch, chunking."""

    def __init__(self, x, table, targets, spec: LMHeadSpec, block: int):
        self.dtype = spec.gemm_dtype(x, table)
        self.tokens, self.vocab = x.shape[0], table.shape[0]
        self.table, self.spec = table, spec
        self.x = x.to(self.dtype).contiguous()
        self.u, self.s_rows = None, targets  # s_rows: a placeholder the kernels ignore without the loss
        if spec.augmented:  # the similarity logits once per distinct target, s_rows[t]: token t's row
            distinct, self.s_rows = torch.unique(targets, return_inverse=True)
            self.u = _target_rows(table, distinct, self.dtype, spec.padding_idx)
        self.columns = chunk_columns(self.tokens, self.vocab, block)
        self.z_buffer = torch.empty(self.tokens * min(self.columns, self.vocab), dtype=self.dtype, device=x.device)
        self.s_buffer = (torch.empty(self.u.shape[0] * min(self.columns, self.vocab), dtype=self.dtype,
                                     device=x.device) if spec.augmented else None)

    def __iter__(self):
        """(start, width, E_c, z_c, s_c): the chunk's logits computed into contiguous scratch."""
        for start in range(0, self.vocab, self.columns):
            stop = min(start + self.columns, self.vocab)
            width = stop - start
            table_c = _table_chunk(self.table, start, stop, self.dtype, self.spec.padding_idx)
            z = torch.mm(self.x, table_c.t(), out=self.z_buffer[:self.tokens * width].view(self.tokens, width))
            s = None
            if self.u is not None:
                rows = self.u.shape[0]
                s = torch.mm(self.u, table_c.t(), out=self.s_buffer[:rows * width].view(rows, width))
            yield start, width, table_c, z, s


def forward(x, table, bias, targets, spec: LMHeadSpec):
    from . import triton_kernels as k
    tokens = x.shape[0]
    zeros = x.new_zeros(tokens, dtype=torch.float32)
    if tokens == 0:
        return zeros, zeros.clone(), zeros.clone(), x.new_zeros(0, STATS, dtype=torch.float32)
    config = tiles()["stats"]
    chunks = _Chunks(x, table, targets, spec, config["BLOCK_V"])
    state = torch.zeros(k.STATE_ROWS, tokens, dtype=torch.float32, device=x.device)
    state[k.M] = state[k.M_S] = -math.inf
    targets = targets.contiguous()
    grid = (-(-tokens // config["BLOCK_N"]),)
    with _on_device(x.device):
        for start, width, _, z, s in chunks:
            bias_c = bias[start:start + width] if bias is not None else z
            k.lm_head_stats_kernel[grid](
                z, s if s is not None else z, chunks.s_rows, bias_c, targets, state,
                tokens, width, start, z.stride(0), (s if s is not None else z).stride(0), state.stride(0),
                1.0 / spec.tau, HAS_BIAS=bias is not None, AUGMENTED=spec.augmented, **config)
    return _finish(state, spec, table.shape[0])


def _finish(state, spec: LMHeadSpec, vocab: int):
    """(loss, ce, kl, stats) from the running statistics, as reference._terms."""
    from . import triton_kernels as k
    lse = state[k.M] + torch.log(state[k.L])
    eps = spec.label_smoothing
    ce = (1 - eps) * (lse - state[k.Z_TARGET]) + eps * (lse - state[k.Z_SUM] / vocab)
    loss = ce + spec.z_loss * lse * lse
    stats = torch.zeros(lse.shape[0], STATS, dtype=torch.float32, device=lse.device)
    stats[:, 0] = lse
    kl = torch.zeros_like(lse)
    if spec.augmented:
        lse_zt = state[k.M] / spec.tau + torch.log(state[k.L_ZT])
        lse_s = state[k.M_S] + torch.log(state[k.L_S])
        kl = state[k.GAP] / state[k.L_S] - lse_s + lse_zt
        loss = loss + spec.kl_coef * kl
        stats[:, 1], stats[:, 2] = lse_zt, lse_s
    return loss, ce, kl, stats


def backward(grad_loss, x, table, bias, targets, stats, spec: LMHeadSpec):
    from . import triton_kernels as k
    tokens, vocab = x.shape[0], table.shape[0]
    grad_table = torch.zeros_like(table)
    grad_bias = torch.zeros_like(bias) if bias is not None else table.new_empty(0)
    if tokens == 0:
        return torch.zeros_like(x), grad_table, grad_bias
    config = dict(tiles()["grad"])
    rows_per_program = config["ROWS_PER_PROGRAM"]
    chunks = _Chunks(x, table, targets, spec, config["BLOCK_V"])
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    stats = stats.to(torch.float32).contiguous()
    grad_loss = grad_loss.to(torch.float32).contiguous()
    targets = targets.contiguous()
    programs = -(-tokens // rows_per_program)
    partial = torch.empty(programs, chunks.columns, dtype=torch.float32, device=x.device) if bias is not None else None
    with _on_device(x.device):
        for start, width, table_c, z, s in chunks:
            bias_c = bias[start:start + width] if bias is not None else z
            partial_c = partial[:, :width] if partial is not None else z
            k.lm_head_grad_kernel[(programs, -(-width // config["BLOCK_V"]))](
                z, s if s is not None else z, chunks.s_rows, bias_c, targets, stats, grad_loss, partial_c,
                tokens, width, start, z.stride(0), (s if s is not None else z).stride(0), stats.stride(0),
                partial_c.stride(0), float(vocab), spec.label_smoothing, spec.z_loss,
                spec.kl_coef / spec.tau, 1.0 / spec.tau, HAS_BIAS=bias is not None,
                AUGMENTED=spec.augmented, **config)
            dz = z  # overwritten in place
            if chunks.dtype == torch.float32:
                grad_x.addmm_(dz, table_c)
            else:  # the 16-bit GEMM rounds each chunk's share once; the sum over chunks is fp32
                grad_x += torch.mm(dz, table_c).float()
            if grad_table.dtype == chunks.dtype:
                torch.mm(dz.t(), chunks.x, out=grad_table[start:start + width])
            else:  # autocast's fp32 table: the 16-bit GEMM's result, as reference.py rounds it
                grad_table[start:start + width] = torch.mm(dz.t(), chunks.x)
            if bias is not None:
                grad_bias[start:start + width] = partial_c.sum(0)
    if spec.padding_idx is not None:
        grad_table[spec.padding_idx] = 0
    return grad_x.to(x.dtype), grad_table, grad_bias


register(HeadBackend(name="triton", priority=INTERPRETER_PRIORITY if interpreting() else PRIORITY,
                     devices=("cuda", "cpu") if interpreting() else ("cuda",),
                     dtypes=(torch.float32, torch.bfloat16, torch.float16),
                     forward=forward, backward=backward, unavailable_reason=unavailable_reason,
                     input_reasons=input_reasons))

"""Backward kernels, launched once per layer from the reduce layer down (see triton_hgt.py).

epilogue_backward_kernel: dh -> dz through dropout (mask regenerated from the seed), activation,
    per-group LayerNorm and the feature shuffle; per-tile partial sums for the LN affine grads.
weight_grad_kernel: dW_j = u_j^T dz_j, a grouped GEMM over all tokens split into fixed token
    ranges, one program per (dW tile, range) writing an fp32 partial; the launcher sums the
    partials (two-stage, no atomics: deterministic). u_j is read from x (gathered by id, scaled)
    and the saved h.
input_grad_kernel: du_j = dz_j W_j^T, split into the x part (added to dx; one writer per column)
    and the h part (dh of the layer below).

Offsets past 2^31 elements: every token index (rows, t) and every per-split / per-tile index is
int64 before it meets a row stride (program ids cast, as Liger does); what stays int32 is
bounded by the parameter count or one row's width (tested by test_offsets_past_2_31_elements).
"""
import triton
import triton.language as tl

from .common import activation_grad, column_source, dropout_keep, fmix32
from .forward import group_moments, shuffled_source


@triton.jit
def upstream_grad(dh_ptr, rows, stride_dh, q, mask, a, row_hash, threshold, drop_scale,
                  ACT: tl.constexpr, DROPOUT: tl.constexpr):
    """d loss / d a, where a is the activation's input (after norm) at output features q."""
    g = tl.load(dh_ptr + rows[:, None] * stride_dh + q[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    if DROPOUT:
        g = tl.where(dropout_keep(row_hash, q, threshold), g * drop_scale, 0.0)
    return g * activation_grad(a, ACT)


@triton.jit
def epilogue_backward_kernel(
        dh_ptr, z_ptr, params_ptr, dz_ptr, dgamma_ptr, dbeta_ptr, ids_ptr, bases_ptr,
        T, stride_dh, stride_z, stride_dz, threshold, drop_scale,
        LAYER: tl.constexpr, G: tl.constexpr, C: tl.constexpr, HAS_NORM: tl.constexpr,
        ACT: tl.constexpr, NW_OFF: tl.constexpr, NB_OFF: tl.constexpr, HAS_IDS: tl.constexpr,
        SHUFFLE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    row_hash = rows.to(tl.uint32)
    if DROPOUT:
        if HAS_IDS:
            row_hash = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.uint32)
        row_hash = fmix32(tl.load(bases_ptr + LAYER).to(tl.uint32) ^ row_hash)
    for j in range(G):
        if HAS_NORM:
            mean, rstd = group_moments(z_ptr, rows, row_mask, stride_z, j, G, C, SHUFFLE,
                                       BLOCK_T, BLOCK_N)
            sum_dv = tl.zeros([BLOCK_T], tl.float32)
            sum_dv_xhat = tl.zeros([BLOCK_T], tl.float32)
            for n0 in range(0, C, BLOCK_N):  # row sums of the LN backward, affine partials
                n = n0 + tl.arange(0, BLOCK_N)
                n_mask = n < C
                mask = row_mask[:, None] & n_mask[None, :]
                q = j * C + n
                v = tl.load(z_ptr + rows[:, None] * stride_z + shuffled_source(q, G, C, SHUFFLE)[None, :],
                            mask=mask, other=0.0)
                xhat = (v - mean[:, None]) * rstd[:, None]
                gamma = tl.load(params_ptr + NW_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
                beta = tl.load(params_ptr + NB_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
                g = upstream_grad(dh_ptr, rows, stride_dh, q, mask, xhat * gamma[None, :] + beta[None, :],
                                  row_hash, threshold, drop_scale, ACT, DROPOUT)
                dv = g * gamma[None, :]
                sum_dv += tl.sum(dv, axis=1)
                sum_dv_xhat += tl.sum(dv * xhat, axis=1)
                part = (pid.to(tl.int64) * G + j) * C + n
                tl.store(dgamma_ptr + part, tl.sum(g * xhat, axis=0), mask=n_mask)
                tl.store(dbeta_ptr + part, tl.sum(g, axis=0), mask=n_mask)
            for n0 in range(0, C, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_mask = n < C
                mask = row_mask[:, None] & n_mask[None, :]
                q = j * C + n
                src = shuffled_source(q, G, C, SHUFFLE)
                v = tl.load(z_ptr + rows[:, None] * stride_z + src[None, :], mask=mask, other=0.0)
                xhat = (v - mean[:, None]) * rstd[:, None]
                gamma = tl.load(params_ptr + NW_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
                beta = tl.load(params_ptr + NB_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
                g = upstream_grad(dh_ptr, rows, stride_dh, q, mask, xhat * gamma[None, :] + beta[None, :],
                                  row_hash, threshold, drop_scale, ACT, DROPOUT)
                dz = rstd[:, None] * (g * gamma[None, :] - sum_dv[:, None] / C
                                      - xhat * (sum_dv_xhat[:, None] / C))
                tl.store(dz_ptr + rows[:, None] * stride_dz + src[None, :], dz, mask=mask)
        else:
            for n0 in range(0, C, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (n < C)[None, :]
                q = j * C + n
                src = shuffled_source(q, G, C, SHUFFLE)
                v = tl.load(z_ptr + rows[:, None] * stride_z + src[None, :], mask=mask, other=0.0)
                g = upstream_grad(dh_ptr, rows, stride_dh, q, mask, v, row_hash, threshold,
                                  drop_scale, ACT, DROPOUT)
                tl.store(dz_ptr + rows[:, None] * stride_dz + src[None, :], g, mask=mask)


@triton.jit
def weight_grad_kernel(
        x_ptr, ids_ptr, hin_ptr, dz_ptr, dw_ptr,
        T, tokens_per_split, stride_x, stride_h, stride_dz, scale,
        P: tl.constexpr, A: tl.constexpr, W: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr,
        WP: tl.constexpr, HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    AG: tl.constexpr = A // G
    C: tl.constexpr = W // G
    """Partial dW_j tile over one split of the tokens: dw[split, j] = u_j^T dz_j (fp32)."""
    N_TILES: tl.constexpr = (C + BLOCK_N - 1) // BLOCK_N
    j = tl.program_id(2)
    split = tl.program_id(1)
    k = (tl.program_id(0) // N_TILES) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = (tl.program_id(0) % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = k < AG
    n_mask = n < C
    is_x, x_col, h_col = column_source(j, k, KIND, P, WP, G, AG)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    t_begin = split.to(tl.int64) * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < t_end
        u = tl.zeros([BLOCK_K, BLOCK_T], dtype)  # u_j^T: x columns and h columns, by mask
        if KIND != 3:
            if HAS_IDS:
                x_rows = tl.load(ids_ptr + t, mask=t_mask, other=0).to(tl.int64)
            else:
                x_rows = t.to(tl.int64)
            ux = tl.load(x_ptr + x_rows[None, :] * stride_x + x_col[:, None],
                         mask=(k_mask & is_x)[:, None] & t_mask[None, :], other=0.0)
            u += (ux.to(tl.float32) * scale).to(dtype)
        if KIND != 0:
            u += tl.load(hin_ptr + t.to(tl.int64)[None, :] * stride_h + h_col[:, None],
                         mask=(k_mask & ~is_x)[:, None] & t_mask[None, :], other=0.0)
        d = tl.load(dz_ptr + t.to(tl.int64)[:, None] * stride_dz + (j * C + n)[None, :],
                    mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(u, d.to(dtype), acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + (split.to(tl.int64) * G + j) * (AG * C) + k[:, None] * C + n[None, :], acc,
             mask=k_mask[:, None] & n_mask[None, :])


@triton.jit
def input_grad_kernel(
        dz_ptr, params_ptr, dx_ptr, dhin_ptr,
        T, stride_dz, stride_dx, stride_dh,
        P: tl.constexpr, A: tl.constexpr, W: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr,
        WP: tl.constexpr, W_OFF: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    AG: tl.constexpr = A // G
    C: tl.constexpr = W // G
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(2)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < T
    k_mask = k < AG
    dtype = params_ptr.dtype.element_ty
    w_group = params_ptr + W_OFF + j * (AG * C)
    acc = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for n0 in range(0, C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < C
        d = tl.load(dz_ptr + rows[:, None] * stride_dz + (j * C + n)[None, :],
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        w_t = tl.load(w_group + k[None, :] * C + n[:, None],
                      mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(d.to(dtype), w_t, acc, input_precision=DOT_PRECISION)
    is_x, x_col, h_col = column_source(j, k, KIND, P, WP, G, AG)
    if KIND != 3:  # each x column has one writer per launch: a plain read-modify-write
        mask = row_mask[:, None] & (k_mask & is_x)[None, :]
        pointers = dx_ptr + rows[:, None] * stride_dx + x_col[None, :]
        tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + acc, mask=mask)
    if KIND != 0:
        tl.store(dhin_ptr + rows[:, None] * stride_dh + h_col[None, :], acc,
                 mask=row_mask[:, None] & (k_mask & ~is_x)[None, :])

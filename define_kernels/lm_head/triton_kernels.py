"""Triton kernels of the `triton` LM-head backend (triton_backend.py); importing this imports triton.

Both read one vocabulary chunk of logits z [N, Vc] (and, for the augmented loss, similarity logits
s [D, Vc] times tau, one row per distinct target, token t reading row s_rows[t]) that cuBLAS /
torch.mm wrote in the compute dtype; every sum is fp32.

lm_head_stats_kernel: one program per BLOCK_N tokens walks the chunk's columns in BLOCK_V tiles and
updates the tokens' running statistics in `state` [STATE_ROWS, N] (read at the start, written at
the end; chunks run one after another, so no two programs touch a token at once).
lm_head_grad_kernel: dz (SPEC §4b, as reference.logit_grad) overwrites z in place, one program per
(ROWS_PER_PROGRAM tokens, BLOCK_V columns); with a bias each program also writes the fp32 column
sums of its dz to one row of `partial` (summed by torch: a fixed order, no atomics).
"""
import triton
import triton.language as tl

# Rows of the running state. z/tau shares z's running max (max(z/tau) = max(z)/tau for tau > 0),
# so its sum of exponentials is rescaled with (m_old - m_new) / tau.
M, L, Z_SUM, Z_TARGET, L_ZT, M_S, L_S, GAP = range(8)
STATE_ROWS = 8
# the same row numbers as constexprs, the only globals a compiled kernel may read
_M, _L, _Z_SUM, _Z_TARGET, _L_ZT, _M_S, _L_S, _GAP = (tl.constexpr(row) for row in range(STATE_ROWS))


@triton.jit
def lm_head_stats_kernel(
        z_ptr, s_ptr, s_rows_ptr, bias_ptr, targets_ptr, state_ptr,  # z [N, VC], s [D, VC]: the chunk
        N, VC, first_col, stride_z, stride_s, stride_state, inv_tau,
        HAS_BIAS: tl.constexpr, AUGMENTED: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    state = state_ptr + rows
    m = tl.load(state + _M * stride_state, mask=row_ok, other=0.0)
    total = tl.load(state + _L * stride_state, mask=row_ok, other=0.0)
    z_sum = tl.load(state + _Z_SUM * stride_state, mask=row_ok, other=0.0)
    if AUGMENTED:
        total_zt = tl.load(state + _L_ZT * stride_state, mask=row_ok, other=0.0)
        m_s = tl.load(state + _M_S * stride_state, mask=row_ok, other=0.0)
        total_s = tl.load(state + _L_S * stride_state, mask=row_ok, other=0.0)
        gap = tl.load(state + _GAP * stride_state, mask=row_ok, other=0.0)
        s_rows = tl.load(s_rows_ptr + rows, mask=row_ok, other=0)
    for start in range(0, VC, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < VC
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # every tile has a valid column, so m_new is finite for kept rows (m starts at -inf)
        z_live = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_live, axis=1))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z_live - m_new[:, None]), axis=1)
        z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        if AUGMENTED:
            total_zt = total_zt * tl.exp((m - m_new) * inv_tau) + \
                tl.sum(tl.exp((z_live - m_new[:, None]) * inv_tau), axis=1)
            s = tl.load(s_ptr + s_rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = s * inv_tau
            s_live = tl.where(col_ok[None, :], s, float("-inf"))
            m_s_new = tl.maximum(m_s, tl.max(s_live, axis=1))
            weight = tl.exp(s_live - m_s_new[:, None])  # 0 at masked columns, where s - z/tau is finite
            rescale = tl.exp(m_s - m_s_new)
            total_s = total_s * rescale + tl.sum(weight, axis=1)
            gap = gap * rescale + tl.sum(weight * (s - z * inv_tau), axis=1)
            m_s = m_s_new
        m = m_new
    # the target's logit, when the target falls in this chunk
    local = tl.load(targets_ptr + rows, mask=row_ok, other=0) - first_col
    hit = row_ok & (local >= 0) & (local < VC)
    picked = tl.load(z_ptr + rows * stride_z + local, mask=hit, other=0.0).to(tl.float32)
    if HAS_BIAS:
        picked += tl.load(bias_ptr + local, mask=hit, other=0.0).to(tl.float32)
    tl.store(state + _Z_TARGET * stride_state, picked, mask=hit)
    tl.store(state + _M * stride_state, m, mask=row_ok)
    tl.store(state + _L * stride_state, total, mask=row_ok)
    tl.store(state + _Z_SUM * stride_state, z_sum, mask=row_ok)
    if AUGMENTED:
        tl.store(state + _L_ZT * stride_state, total_zt, mask=row_ok)
        tl.store(state + _M_S * stride_state, m_s, mask=row_ok)
        tl.store(state + _L_S * stride_state, total_s, mask=row_ok)
        tl.store(state + _GAP * stride_state, gap, mask=row_ok)


@triton.jit
def lm_head_grad_kernel(
        z_ptr, s_ptr, s_rows_ptr, bias_ptr, targets_ptr, stats_ptr, grad_ptr, partial_ptr,
        N, VC, first_col, stride_z, stride_s, stride_stats, stride_partial,
        vocab, smoothing, z_loss, kl_coef_over_tau, inv_tau,
        HAS_BIAS: tl.constexpr, AUGMENTED: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < VC
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    column_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    first_row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    for offset in range(0, ROWS_PER_PROGRAM, BLOCK_N):
        rows = first_row + offset + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        lse = tl.load(stats_ptr + rows * stride_stats, mask=row_ok, other=0.0)
        grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
        local = tl.load(targets_ptr + rows, mask=row_ok, other=0) - first_col
        z_ptrs = z_ptr + rows[:, None] * stride_z + cols[None, :]
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += bias[None, :]
        p = tl.exp(z - lse[:, None])
        dz = (1.0 + 2.0 * z_loss * lse)[:, None] * p - smoothing / vocab
        dz -= tl.where(cols[None, :] == local[:, None], 1.0 - smoothing, 0.0)
        if AUGMENTED:
            lse_zt = tl.load(stats_ptr + rows * stride_stats + 1, mask=row_ok, other=0.0)
            lse_s = tl.load(stats_ptr + rows * stride_stats + 2, mask=row_ok, other=0.0)
            s_rows = tl.load(s_rows_ptr + rows, mask=row_ok, other=0)
            s = tl.load(s_ptr + s_rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q = tl.exp(z * inv_tau - lse_zt[:, None])
            target = tl.exp(s * inv_tau - lse_s[:, None])
            dz += kl_coef_over_tau * (q - target)
        dz = tl.where(mask, dz * grad[:, None], 0.0)
        tl.store(z_ptrs, dz.to(z_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            column_sum += tl.sum(dz, axis=0)
    if HAS_BIAS:
        tl.store(partial_ptr + tl.program_id(0) * stride_partial + cols, column_sum, mask=col_ok)

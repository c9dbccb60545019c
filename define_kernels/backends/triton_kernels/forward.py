"""The fused forward: the whole HGT stack for a tile of BLOCK_T tokens in one program.

Per layer (unrolled at compile time; every width, group count and offset is a constexpr):
  1. grouped linear: for each group j and BLOCK_N-wide slice of its c outputs, a tl.dot loop over
     the x part then the h part of u_j (the skip concatenation is never built), + bias, fp32
     result written to the tile's rows of the z scratch;
  2. epilogue: for each output group (read through the feature shuffle, a fixed permutation of
     z's columns), per-group LayerNorm (fp32 moments merged chunk by chunk), activation,
     dropout from the counter hash, result written in the parameter dtype to the h scratch
     (or to y for the reduce layer).
The scratch rows belong to this program only and are re-read right after being written (from L2
while the in-flight scratch fits it; see triton_hgt.py); a CTA barrier orders the two stages.
Offsets: `rows` and the gathered table rows are int64 (the program id is cast before it is scaled
by BLOCK_T), so row x stride products stay exact past 2^31 elements; parameter offsets are
constexprs bounded by the parameter count. With SAVE-layout offsets (distinct columns per
layer) the same kernel leaves every layer's z and h behind for the backward.
With an in-proj (IN_PROJ, layer 0, its own dropout probability), layer 0 reads the gathered rows
and writes x' into the h scratch at XP_OFF; every later layer reads its x part from there.
"""
import triton
import triton.language as tl

from .common import activate, dropout_keep, fmix32, group_input_ranges


@triton.jit
def accumulate_part(acc, src_ptr, src_rows, row_mask, src_stride, src_start, length, scale,
                    w_ptr, w_row_start, n, n_mask, C: tl.constexpr, APPLY_SCALE: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += src[rows, src_start + k] (* scale) @ W[w_row_start + k, n] for k in [0, length)."""
    dtype = w_ptr.dtype.element_ty
    for k0 in range(0, length, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < length
        u = tl.load(src_ptr + src_rows[:, None] * src_stride + (src_start + k)[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if APPLY_SCALE:
            u = (u.to(tl.float32) * scale).to(dtype)
        w = tl.load(w_ptr + (w_row_start + k)[:, None] * C + n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(u, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def shuffled_source(q, G: tl.constexpr, C: tl.constexpr, SHUFFLE: tl.constexpr):
    """Column of z (pre-shuffle) that lands at output feature q: [g, c] -> [c, g] -> [g, c]."""
    if SHUFFLE:
        q = (q % G) * C + q // G
    return q


@triton.jit
def group_moments(z_ptr, rows, row_mask, stride_z, j, G: tl.constexpr, C: tl.constexpr,
                  SHUFFLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 mean and 1/std over output group j's c features, chunks merged (Chan et al.)."""
    mean = tl.zeros([BLOCK_T], tl.float32)
    m2 = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < C
        src = shuffled_source(j * C + n, G, C, SHUFFLE)
        v = tl.load(z_ptr + rows[:, None] * stride_z + src[None, :],
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        seen = n0 * 1.0
        fresh = tl.minimum(C - n0, BLOCK_N) * 1.0
        chunk_mean = tl.sum(v, axis=1) / fresh
        d = tl.where(n_mask[None, :], v - chunk_mean[:, None], 0.0)
        delta = chunk_mean - mean
        mean += delta * (fresh / (seen + fresh))
        m2 += tl.sum(d * d, axis=1) + delta * delta * (seen * fresh / (seen + fresh))
    return mean, 1.0 / tl.sqrt(m2 / C + 1e-5)


@triton.jit
def layer_forward(x_ptr, x_rows, stride_x, scale, hin_ptr, z_ptr, out_ptr, out_stride,
                  params_ptr, rows, row_mask, stride_z, stride_h, row_hash, threshold, drop_scale,
                  P: tl.constexpr, A: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                  KIND: tl.constexpr, WP: tl.constexpr, HAS_NORM: tl.constexpr, ACT: tl.constexpr,
                  W_OFF: tl.constexpr, B_OFF: tl.constexpr, NW_OFF: tl.constexpr,
                  NB_OFF: tl.constexpr, SHUFFLE: tl.constexpr, DROPOUT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    AG: tl.constexpr = A // G
    C: tl.constexpr = W // G
    out_dtype = out_ptr.dtype.element_ty
    # 1. grouped linear -> z (fp32, pre-shuffle layout)
    for j in range(G):
        x_start, x_len, h_start, h_len = group_input_ranges(j, KIND, P, WP, G, AG)
        w_group = params_ptr + W_OFF + j * (AG * C)
        for n0 in range(0, C, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < C
            acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            if KIND != 3:
                acc = accumulate_part(acc, x_ptr, x_rows, row_mask, stride_x, x_start, x_len,
                                      scale, w_group, 0, n, n_mask, C, True, BLOCK_K,
                                      DOT_PRECISION)
            if KIND != 0:
                acc = accumulate_part(acc, hin_ptr, rows, row_mask, stride_h, h_start, h_len,
                                      scale, w_group, x_len, n, n_mask, C, False, BLOCK_K,
                                      DOT_PRECISION)
            bias = tl.load(params_ptr + B_OFF + j * C + n, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
            tl.store(z_ptr + rows[:, None] * stride_z + (j * C + n)[None, :], acc,
                     mask=row_mask[:, None] & n_mask[None, :])
    tl.debug_barrier()
    # 2. shuffle (as a read permutation), LayerNorm, activation, dropout -> h
    for j in range(G):
        if HAS_NORM:
            mean, rstd = group_moments(z_ptr, rows, row_mask, stride_z, j, G, C, SHUFFLE,
                                       BLOCK_T, BLOCK_N)
        for n0 in range(0, C, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < C
            mask = row_mask[:, None] & n_mask[None, :]
            q = j * C + n
            v = tl.load(z_ptr + rows[:, None] * stride_z + shuffled_source(q, G, C, SHUFFLE)[None, :],
                        mask=mask, other=0.0)
            if HAS_NORM:
                gamma = tl.load(params_ptr + NW_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
                beta = tl.load(params_ptr + NB_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
                v = (v - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            v = activate(v, ACT)
            if DROPOUT:
                v = tl.where(dropout_keep(row_hash, q, threshold), v * drop_scale, 0.0)
            tl.store(out_ptr + rows[:, None] * out_stride + q[None, :], v.to(out_dtype), mask=mask)
    tl.debug_barrier()


@triton.jit
def hgt_forward_kernel(
        # pointers
        x_ptr, ids_ptr, params_ptr, z_ptr, h_ptr, y_ptr, bases_ptr,
        # runtime sizes and scalars
        T, stride_x, stride_z, stride_h, scale, threshold, drop_scale, proj_threshold,
        proj_drop_scale,
        # per-layer tables (tuples with one entry per layer)
        IN: tl.constexpr, OUT: tl.constexpr, GROUPS: tl.constexpr, KINDS: tl.constexpr,
        PREV_W: tl.constexpr, NORMS: tl.constexpr, ACTS: tl.constexpr, W_OFF: tl.constexpr,
        B_OFF: tl.constexpr, NW_OFF: tl.constexpr, NB_OFF: tl.constexpr, Z_OFF: tl.constexpr,
        H_OFF: tl.constexpr, HIN_OFF: tl.constexpr,
        # stack options and tiles
        P: tl.constexpr, NUM_LAYERS: tl.constexpr, HAS_IDS: tl.constexpr, SHUFFLE: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, IN_PROJ: tl.constexpr,
        XP_OFF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[rows] = HGT(x[ids[rows]] * scale) for the BLOCK_T rows of this program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    if HAS_IDS:  # fused Map lookup: gather the table rows by id
        x_rows = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        x_rows = rows
    row_keys = x_rows.to(tl.uint32)  # dropout row key: token id, else row index
    if IN_PROJ:  # the x of layers >= 1: x', the in-proj's output rows in the h scratch
        skip_ptr = h_ptr + XP_OFF
        skip_rows = rows
        skip_stride = stride_h
        skip_scale = 1.0
    else:
        skip_ptr = x_ptr
        skip_rows = x_rows
        skip_stride = stride_x
        skip_scale = scale
    for layer in tl.static_range(NUM_LAYERS):
        row_hash = row_keys
        if DROPOUT:
            row_hash = fmix32(tl.load(bases_ptr + layer).to(tl.uint32) ^ row_keys)
        if IN_PROJ and layer == 0:  # the in-proj: gathered rows -> x' (h at XP_OFF)
            layer_forward(x_ptr, x_rows, stride_x, scale, h_ptr, z_ptr + Z_OFF[layer],
                          h_ptr + XP_OFF, stride_h, params_ptr, rows, row_mask, stride_z,
                          stride_h, row_hash, proj_threshold, proj_drop_scale,
                          P, IN[layer], OUT[layer], GROUPS[layer], KINDS[layer], PREV_W[layer],
                          NORMS[layer], ACTS[layer], W_OFF[layer], B_OFF[layer], NW_OFF[layer],
                          NB_OFF[layer], SHUFFLE, DROPOUT, DOT_PRECISION, BLOCK_T, BLOCK_N, BLOCK_K)
        elif layer == NUM_LAYERS - 1:
            layer_forward(skip_ptr, skip_rows, skip_stride, skip_scale, h_ptr + HIN_OFF[layer],
                          z_ptr + Z_OFF[layer], y_ptr, OUT[layer], params_ptr, rows, row_mask,
                          stride_z, stride_h, row_hash, threshold, drop_scale,
                          P, IN[layer], OUT[layer], GROUPS[layer], KINDS[layer], PREV_W[layer],
                          NORMS[layer], ACTS[layer], W_OFF[layer], B_OFF[layer], NW_OFF[layer],
                          NB_OFF[layer], SHUFFLE, DROPOUT, DOT_PRECISION, BLOCK_T, BLOCK_N, BLOCK_K)
        else:
            layer_forward(skip_ptr, skip_rows, skip_stride, skip_scale, h_ptr + HIN_OFF[layer],
                          z_ptr + Z_OFF[layer], h_ptr + H_OFF[layer], stride_h, params_ptr, rows,
                          row_mask, stride_z, stride_h, row_hash, threshold, drop_scale,
                          P, IN[layer], OUT[layer], GROUPS[layer], KINDS[layer], PREV_W[layer],
                          NORMS[layer], ACTS[layer], W_OFF[layer], B_OFF[layer], NW_OFF[layer],
                          NB_OFF[layer], SHUFFLE, DROPOUT, DOT_PRECISION, BLOCK_T, BLOCK_N, BLOCK_K)

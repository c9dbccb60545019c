"""Device helpers shared by the forward and backward kernels.

KIND and ACT constexprs are the codes of define_kernels/codes.py (InputKind X 0, MIX 1, CONCAT 2,
PREV 3; Activation NONE 0, GELU 1, RELU 2, SILU 3), from triton_layout.stack_layout.
"""
import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    """MurmurHash3 finalizer on uint32 (wrapping multiplies), as reference._fmix32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(row_hash, features, threshold):
    """Keep-mask [rows, cols]: row_hash = fmix32(layer_base ^ row_key) (uint32 [rows])."""
    draw = fmix32(row_hash[:, None] ^ features[None, :].to(tl.uint32)) >> 8
    return draw.to(tl.int32) >= threshold


@triton.jit
def activate(v, ACT: tl.constexpr):
    if ACT == 1:  # exact (erf) GELU
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        v = tl.maximum(v, 0.0)
    elif ACT == 3:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def activation_grad(v, ACT: tl.constexpr):
    """d act(v) / dv (1 where ACT is none)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        d = cdf + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif ACT == 2:
        d = tl.where(v > 0.0, 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-v))
        d = s * (1.0 + v * (1.0 - s))
    else:
        d = tl.full(v.shape, 1.0, tl.float32)
    return d


@triton.jit
def group_input_ranges(j, KIND: tl.constexpr, P: tl.constexpr, WP: tl.constexpr,
                       G: tl.constexpr, AG: tl.constexpr):
    """Group j's input u_j = [x[x_start : x_start+x_len], h[h_start : h_start+h_len]].

    The weight rows of the x part are [0, x_len), those of the h part [x_len, AG): the skip
    concatenation is never materialized (u_j @ W_j = x_part @ W_top + h_part @ W_bottom).
    """
    if KIND == 0:    # first layer: u = x, split into G groups
        x_start = j * AG
        x_len = j * 0 + AG
        h_start = j * 0
    elif KIND == 1:  # split-and-mix: chunk j of x then chunk j of h
        x_start = j * (P // G)
        x_len = j * 0 + P // G
        h_start = j * (WP // G)
    elif KIND == 2:  # plain concat [x, h], split into G groups (a group may straddle)
        x_start = j * AG
        x_len = tl.maximum(tl.minimum(j * AG + AG, P) - j * AG, 0)
        h_start = tl.maximum(j * AG, P) - P
    else:            # no skip: u = h
        x_start = j * 0
        x_len = j * 0
        h_start = j * AG
    return x_start, x_len, h_start, AG - x_len


@triton.jit
def column_source(j, k, KIND: tl.constexpr, P: tl.constexpr, WP: tl.constexpr,
                  G: tl.constexpr, AG: tl.constexpr):
    """Where column k (group-local, a vector) of group j's input comes from: (is_x, x_col, h_col)."""
    if KIND == 0:
        is_x = k >= 0
        x_col = j * AG + k
        h_col = k * 0
    elif KIND == 1:
        is_x = k < P // G
        x_col = j * (P // G) + k
        h_col = j * (WP // G) + k - P // G
    elif KIND == 2:
        is_x = j * AG + k < P
        x_col = j * AG + k
        h_col = j * AG + k - P
    else:
        is_x = k < 0
        x_col = k * 0
        h_col = j * AG + k
    return is_x, x_col, h_col

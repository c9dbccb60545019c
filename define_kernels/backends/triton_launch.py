"""The launches of the `triton` backend: the whole HGT stack of docs/math.md §2 in one fused Triton kernel launch.

Design
------
Forward (`triton_kernels/forward.py`, ONE launch): each program owns a tile of BLOCK_T tokens and
runs every layer for it: the Map lookup (rows of the table gathered by id, times `scale`), each
grouped linear as tl.dot tiles (fp32 accumulate, bf16/fp16 tensor cores, fp32 in IEEE mode),
the split-and-mix / concat skip read straight from x and the previous h (u_j @ W_j =
x_part @ W_top + h_part @ W_bottom, never materialized), the feature shuffle folded into how the
epilogue reads z (a fixed column permutation), per-group LayerNorm with fp32 statistics,
activation, dropout from the common counter hash, and the reduce layer. Widths that are not
powers of two (44, 136, ...) are covered by masked BLOCK_N / BLOCK_K tiles (all >= 16 for
tl.dot). The layer table is unrolled at compile time: every width, group count and parameter
offset is a constexpr, so one kernel is compiled per HGTConfig (and dtype).
Intermediates live in a per-tile global scratch, not in registers: z (fp32, pre-norm) and
h (parameter dtype), rows indexed by token, each program reading back only the rows it just
wrote (a CTA barrier orders the stages). They are not guaranteed to stay in L2: with one
program per SM in flight (the bf16 autotune configs use 206-250 registers x 256 threads), wt103-base
in bf16 keeps 132 x 64 x 1024 x (4 + 2 x 2) bytes = 66 MB of scratch in flight, more than a
50 MB L2; bench/gpu_cuda_notes.md weighs the split design that avoids it. Forward-only scratch: T x max_w fp32 for z plus
T x 2 max_w (ping-pong) for h. Parameters are packed into one flat buffer, re-packed only when
a parameter changes (address + version counter, as the inference cache). Precision: x * scale
and h enter the dots in the parameter dtype (as in the reference run in that dtype); z, LN
statistics, activation and dropout are fp32, rounded once when h is stored.

Backward (`triton_kernels/backward.py`, 1 + 3 L launches + a few torch reductions): the op
contract hands backward only the inputs, so backward first re-runs the fused forward in SAVE
layout, keeping every layer's z (fp32) and h (dtype): saved-activation memory
T x sum_l w_l x (4 + dtype bytes), freed when backward returns, plus three fp32 buffers of
T x max_w (dz, dh ping-pong) and one of T x p (e.g. wt103-base, T = 16384: about 0.5 GB). Then, layer by layer from the reduce layer down:
  * epilogue backward (grid over token tiles): dropout mask regenerated from the seed,
    activation derivative, LayerNorm backward, un-shuffle -> dz (fp32); per-tile partial sums
    for the LN affine gradients;
  * weight gradient: a grouped GEMM over ALL tokens, dW_j = u_j^T dz_j, split into fixed token
    ranges (enough programs to fill the GPU), each program writing an fp32 partial tile that
    torch then sums (two-stage, no atomics); u_j is read from x and the saved h. Bias and LN
    affine gradients are likewise sums of dz and of per-tile partials;
  * input gradient: du_j = dz_j W_j^T, scattered to the x part (accumulated over layers into an
    fp32 [T, p] buffer; each column has exactly one writer per launch) and to dh of the layer
    below.
No atomics and fixed reduction orders anywhere (token splits depend only on the shapes and the
device's SM count): results are deterministic, so the backend never refuses under
torch.use_deterministic_algorithms; there the forward also skips autotuning (a timing-driven
tile choice could change the K order of the dots between processes) and uses deterministic_tiles(dtype). grad_rows is per gathered row (op contract);
the op's autograd rule scatters it into the table.

Every launch goes through a `wrap` hook: triton_library.py, the only caller, passes
torch.library.wrap_triton, so the public op (eager) and a torch.compile'd graph run the same
launches and Inductor sees the kernels. Imports: this module -> triton_layout, triton_kernels;
triton_library -> this module; triton_hgt (the registry entry) -> triton_library."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from typing import Optional, Tuple

import torch

from .. import env
from ..config import HGTConfig
from .triton_layout import _dropout_args, layer_dropout_args, packed_params, stack_layout


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): pinned tiles, no autotune."""
    return env.flag("TRITON_INTERPRET")


@functools.lru_cache(maxsize=None)
def _import_error(kernel_modules: Tuple[str, ...]) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return ("triton not installed (CUDA builds of torch bring it; on CPU: pip install "
                "'define-kernels[triton]' for the interpreter)")
    try:
        for module in kernel_modules:
            importlib.import_module(module)
    except Exception as error:  # a broken install must not break the registry
        return f"triton import failed: {type(error).__name__}: {error}"
    return None


def unavailable_reason(*kernel_modules: str) -> Optional[str]:
    """Why a Triton backend whose kernels live in `kernel_modules` cannot run here (None if it
    can): triton missing or failing to import them, or neither a CUDA device nor the interpreter.
    The import is tried once per process; the device check on every call."""
    reason = _import_error(kernel_modules)
    if reason:
        return reason
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device and TRITON_INTERPRET unset"
    return None


# ------------------------------------------------------------------------------- tile configs
# (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) per dtype. The rule every candidate meets, on
# every docs/math.md §5 workload compiled for sm_90a (bench.resource_report, which .ci checks):
# at most 255 registers and no spill, and for 16-bit dots a wgmma lowering (BLOCK_T >= 64, warps
# a multiple of 4). Larger tiles spill; fp32 has no wgmma, so its tiles are narrower with more
# warps. Few candidates on purpose: every one compiles the whole unrolled stack.
FORWARD_TILES = {
    torch.bfloat16: [(64, 64, 32, 8, 3), (64, 32, 64, 8, 3), (64, 32, 32, 8, 3)],
    torch.float16: [(64, 32, 32, 8, 3)],
    torch.float32: [(32, 32, 32, 16, 3), (32, 32, 16, 8, 3)],
}


def forward_configs(dtype: torch.dtype = torch.bfloat16):
    """Autotune candidates of the fused forward on a GPU for `dtype` (tiles >= 16 for tl.dot)."""
    import triton
    return [triton.Config({"BLOCK_T": t, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for t, n, k, w, s in FORWARD_TILES[dtype]]


def deterministic_tiles(dtype: torch.dtype) -> dict:
    """The pinned forward tile (deterministic mode): the dtype's last, smallest candidate."""
    t, n, k, w, s = FORWARD_TILES[dtype][-1]
    return {"BLOCK_T": t, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}


INTERPRETER_TILES = {"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def backward_tiles(dtype: torch.dtype) -> dict:
    """Fixed tiles of the backward kernels (no autotune: one of them accumulates into its output)."""
    if interpreting():
        return dict(INTERPRETER_TILES, num_warps=4, epilogue_warps=4, epilogue_block_n=16,
                    input_grad_warps=4)
    # The same no-spill rule as FORWARD_TILES: the elementwise LN/act/dropout backward keeps ~6
    # fp32 [BLOCK_T, BLOCK_N] values live, hence 32 columns at 8 warps; the 16-bit input-gradient
    # GEMM needs 8 warps to stay within the registers.
    if dtype == torch.float32:
        return {"BLOCK_T": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "epilogue_warps": 8,
                "epilogue_block_n": 32, "input_grad_warps": 4}
    return {"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "epilogue_warps": 8,
            "epilogue_block_n": 32, "input_grad_warps": 8}


def weight_grad_splits(programs: int, rows: int, block_t: int, device) -> int:
    """How many token ranges the weight-gradient GEMM splits into: enough programs to fill the
    GPU (4 per SM), never more ranges than token tiles. Fixed by shapes: results reproducible."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: one range per token tile, so tests cover the two-stage sum
        target = rows
    wanted = -(-target // max(programs, 1))
    return max(1, min(wanted, -(-rows // block_t)))


_FORWARD_KEYS = ["IN", "OUT", "GROUPS", "KINDS", "NORMS", "ACTS", "Z_OFF", "SHUFFLE", "DROPOUT",
                 "HAS_IDS", "DOT_PRECISION", "IN_PROJ"]


@functools.lru_cache(maxsize=None)
def _forward_kernel(dtype: torch.dtype = torch.bfloat16):
    """The fused forward: autotuned on a GPU over the dtype's candidates (one autotuner per
    dtype), the plain kernel (pinned tiles) when interpreting."""
    import triton
    from .triton_kernels.forward import hgt_forward_kernel
    if interpreting():
        return hgt_forward_kernel
    return triton.autotune(configs=forward_configs(dtype), key=_FORWARD_KEYS)(hgt_forward_kernel)


def _forward_launch(dtype: torch.dtype):
    """(kernel, pinned tile kwargs): pinned under the interpreter and in deterministic mode."""
    if interpreting():
        return _forward_kernel(dtype), INTERPRETER_TILES
    if torch.are_deterministic_algorithms_enabled():
        from .triton_kernels.forward import hgt_forward_kernel
        return hgt_forward_kernel, deterministic_tiles(dtype)
    return _forward_kernel(dtype), {}


# ------------------------------------------------------------------------------- launches
def _no_wrap(kernel):
    return kernel


def _pack(params, wrap) -> torch.Tensor:
    """The flat parameter buffer: cached for real tensors (eager, the triton_ops included); a
    plain cat while traced (fake tensors have no address or version to key a cache on)."""
    from torch._subclasses.fake_tensor import is_fake
    if not any(is_fake(p) for p in params) and not torch.compiler.is_compiling():
        return packed_params.get(params)
    return torch.cat([p.reshape(-1) for p in params])


def on_device(device):
    """Launch on the tensors' GPU (Triton uses the current device and its current stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def run_forward(x, ids, params, config: HGTConfig, scale: float, seed, save: bool, wrap=_no_wrap):
    """Launch the fused forward; returns (y, z_scratch, h_scratch, layout).

    wrap: applied to every kernel before launch (torch.library.wrap_triton in triton_library.py).
    """
    import triton
    layout = stack_layout(config, save)
    x = x.contiguous()
    rows = x.shape[0] if ids is None else ids.shape[0]
    device, dtype = x.device, x.dtype
    y = torch.empty(rows, config.out_dim, device=device, dtype=dtype)
    z = torch.empty(rows, layout["z_width"], device=device, dtype=torch.float32)
    h = torch.empty(rows, layout["h_width"], device=device, dtype=dtype)
    if rows == 0:
        return y, z, h, layout
    dropout, bases, threshold, drop_scale = _dropout_args(config, seed, device)
    proj_threshold, proj_drop_scale = layer_dropout_args(config, 0)  # layer 0's: the in-proj's own p
    flat = _pack(params, wrap)
    ids_arg = ids.contiguous() if ids is not None else x  # unused when HAS_IDS is False
    tables = {k: v for k, v in layout.items() if k not in ("z_width", "h_width", "num_params")}
    kernel, tiles = _forward_launch(dtype)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_T"]),)  # noqa: E731
    with on_device(device):
        wrap(kernel)[grid](
            x, ids_arg, flat, z, h, y, bases,
            rows, x.stride(0), z.stride(0), h.stride(0), float(scale), threshold, drop_scale,
            proj_threshold, proj_drop_scale, HAS_IDS=ids is not None, DROPOUT=dropout,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", **tables, **tiles)
    return y, z, h, layout


def run_backward(grad_y, x, ids, params, config, scale, seed, wrap=_no_wrap):
    import triton
    from .triton_kernels.backward import epilogue_backward_kernel, input_grad_kernel, weight_grad_kernel
    params = [p.detach() for p in params]
    dtype, device = x.dtype, x.device
    _, z, h, layout = run_forward(x, ids, params, config, scale, seed, save=True, wrap=wrap)
    x = x.contiguous()
    rows = x.shape[0] if ids is None else ids.shape[0]
    if rows == 0:
        return x.new_zeros(0, config.input_width), [torch.zeros_like(p) for p in params]
    flat = _pack(params, wrap)
    dropout, bases, threshold, drop_scale = _dropout_args(config, seed, device)
    ids_arg = ids.contiguous() if ids is not None else x
    tiles = backward_tiles(dtype)
    block_t, block_n, block_k = tiles["BLOCK_T"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    warps = tiles["num_warps"]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    row_tiles = triton.cdiv(rows, block_t)
    widest = max(layer.out_features for layer in config.layers)
    dx = torch.zeros(rows, config.input_width, device=device, dtype=torch.float32)
    # With an in-proj, layers >= 1 read x' (h at XP_OFF) and add their x-part gradient to dxp,
    # which is then the output gradient of layer 0; layer 0's input gradient goes to dx.
    dxp = torch.zeros(rows, config.in_dim, device=device, dtype=torch.float32) if config.has_in_proj else dx
    x_prime = h[:, layout["XP_OFF"]:]
    dz = torch.empty(rows, widest, device=device, dtype=torch.float32)
    dh_buffers = [torch.empty(rows, widest, device=device, dtype=torch.float32) for _ in range(2)]
    dh = grad_y.contiguous()
    per_layer = [None] * len(config.layers)
    for index in reversed(range(len(config.layers))):
        layer = config.layers[index]
        groups, width, fan_in = layer.groups, layer.out_features, layer.in_features
        c, a_g = width // groups, fan_in // groups
        has_norm = config.layer_has_norm(index)
        reads_x_prime = config.has_in_proj and index > 0
        if config.has_in_proj and index == 0:
            dh = dxp
        threshold, drop_scale = layer_dropout_args(config, index)
        partial_shape = (row_tiles, groups, c) if has_norm else (1,)
        dgamma = torch.empty(partial_shape, device=device, dtype=torch.float32)
        dbeta = torch.empty(partial_shape, device=device, dtype=torch.float32)
        z_layer = z[:, layout["Z_OFF"][index]:]
        wrap(epilogue_backward_kernel)[(row_tiles,)](
            dh, z_layer, flat, dz, dgamma, dbeta, ids_arg, bases,
            rows, dh.stride(0), z.stride(0), dz.stride(0), threshold, drop_scale,
            LAYER=index, G=groups, C=c, HAS_NORM=has_norm, ACT=layout["ACTS"][index],
            NW_OFF=layout["NW_OFF"][index], NB_OFF=layout["NB_OFF"][index],
            HAS_IDS=ids is not None, SHUFFLE=config.shuffle, DROPOUT=dropout,
            BLOCK_T=block_t, BLOCK_N=tiles["epilogue_block_n"], num_warps=tiles["epilogue_warps"])
        shape = dict(P=config.in_dim, A=fan_in, W=width, G=groups,
                     KIND=layout["KINDS"][index], WP=layout["PREV_W"][index],
                     DOT_PRECISION=precision, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
        h_in = h[:, layout["HIN_OFF"][index]:]
        weight_tiles = triton.cdiv(a_g, block_k) * triton.cdiv(c, block_n)
        splits = weight_grad_splits(weight_tiles * groups, rows, block_t, device)
        tokens_per_split = triton.cdiv(triton.cdiv(rows, splits), block_t) * block_t
        splits = triton.cdiv(rows, tokens_per_split)
        partial_weight = torch.empty(splits, groups, a_g, c, device=device, dtype=torch.float32)
        x_in, x_scale = (x_prime, 1.0) if reads_x_prime else (x, float(scale))
        wrap(weight_grad_kernel)[(weight_tiles, splits, groups)](
            x_in, ids_arg, h_in, dz, partial_weight, rows, tokens_per_split, x_in.stride(0),
            h.stride(0), dz.stride(0), x_scale, HAS_IDS=ids is not None and not reads_x_prime,
            num_warps=warps, **shape)
        grad_weight = partial_weight.sum(0).to(dtype)
        dh_below = dh_buffers[index % 2]
        dx_in = dxp if reads_x_prime else dx
        wrap(input_grad_kernel)[(row_tiles, triton.cdiv(a_g, block_k), groups)](
            dz, flat, dx_in, dh_below, rows, dz.stride(0), dx_in.stride(0), dh_below.stride(0),
            W_OFF=layout["W_OFF"][index], num_warps=tiles["input_grad_warps"], **shape)
        grads = [grad_weight, dz[:, :width].reshape(rows, groups, c).sum(0).to(dtype)]
        if has_norm:
            grads += [dgamma.sum((0, 1)).to(dtype), dbeta.sum((0, 1)).to(dtype)]
        per_layer[index] = grads
        dh = dh_below
    grad_rows = (dx * scale).to(dtype)
    return grad_rows, [grad for grads in per_layer for grad in grads]
